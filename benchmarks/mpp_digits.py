"""Does masked-patch-prediction pre-training help with few labels? (digits)

  python -m benchmarks.mpp_digits [--out /tmp/mpp_digits] [--seeds 0,1,2]
      [--labelled 100,500] [--steps 300]

1. Pre-trains the digits model with configs/mpp_pretrain.py:runlocal on all
   1,498 training images, without their labels.
2. For each number of labelled images (the first n of the training split,
   about n/10 per class) and seed, trains configs/digits.py twice with the
   same labels, steps and seed: (a) from scratch, (b) from the MPP weights
   (`--config.pretrained_path`).
Prints a table of test accuracies (mean and per seed) and writes
results.json; every run is a plain `python -m vit_jax.main` command (shown).
"""

import argparse
import json
import os
import subprocess
import sys


def run(args, workdir):
  """Runs vit_jax.main unless `workdir` already finished; final metrics."""
  final = os.path.join(workdir, 'final_params.npz')
  command = [
      sys.executable,
      '-m',
      'vit_jax.main',
      *args,
      f'--workdir={workdir}',
  ]
  print('$', ' '.join(command[1:]), flush=True)
  if not os.path.exists(final):
    subprocess.run(
        command,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [l for l in lines if 'eval/examples' in l][-1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/mpp_digits')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--labelled', default='100,500')
  parser.add_argument('--steps', type=int, default=300)
  args = parser.parse_args()
  pretrained = os.path.join(args.out, 'mpp_pretrain')
  pre = run(['--config=configs/mpp_pretrain.py:runlocal'], pretrained)
  print(
      f'MPP pre-training: eval/mpp_accuracy {pre["eval/mpp_accuracy"]:.4f}'
      + ''.join(
          f', {k} {v:.4f}'
          for k, v in sorted(pre.items())
          if k.startswith('fewshot/') and not k.endswith('_std')
      )
  )
  results = {'pretraining': pre, 'runs': []}
  for n in (int(x) for x in args.labelled.split(',')):
    for seed in (int(s) for s in args.seeds.split(',')):
      common = [
          '--config=configs/digits.py',
          f'--config.train_split=train[:{n}]',
          f'--config.total_steps={args.steps}',
          f'--config.warmup_steps={max(1, args.steps // 10)}',
          f'--config.eval_every={args.steps}',
          f'--config.checkpoint_every={args.steps}',
          '--config.evals.fewshot.every=0',
          f'--config.seed={seed}',
      ]
      for init in ('scratch', 'mpp'):
        extra = (
            [f'--config.pretrained_path={pretrained}/final_params.npz']
            if init == 'mpp'
            else []
        )
        metrics = run(
            common + extra, os.path.join(args.out, f'{init}_n{n}_seed{seed}')
        )
        results['runs'].append(
            {
                'labelled': n,
                'seed': seed,
                'init': init,
                'accuracy': metrics['eval/accuracy'],
            }
        )
  print('\n| labelled images | from scratch | MPP pre-trained |')
  print('|---|---|---|')
  for n in sorted({r['labelled'] for r in results['runs']}):
    cells = []
    for init in ('scratch', 'mpp'):
      accs = [
          r['accuracy']
          for r in results['runs']
          if r['labelled'] == n and r['init'] == init
      ]
      cells.append(
          f'{100 * sum(accs) / len(accs):.2f}% ('
          + ', '.join(f'{100 * a:.1f}' for a in accs)
          + ')'
      )
    print(f'| {n} | {cells[0]} | {cells[1]} |')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
