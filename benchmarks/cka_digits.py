r"""Do a ViT and a BiT ResNet trained on the same digits learn alike? (CKA)

  python -m benchmarks.cka_digits [--out /tmp/cka_digits] [--steps 600] \
      [--vit_blocks 6] [--figures docs/figures]

1. Trains configs/digits.py with `--vit_blocks` encoder blocks and
   configs/digits_resnet.py (root block + 3 stages of 2 bottleneck units),
   both for `--steps` steps of the same schedule, from scratch, on the same
   images (plain `python -m vit_jax.main` commands, shown; a run that
   already finished is reused).
2. Runs `python -m vit_jax.analysis cka` on the two runs over the whole
   digits test split (299 images, minibatches of 64).
3. Copies the figures and cka.json to `--figures` (as cka_vit.png,
   cka_resnet.png, cka_vit_vs_resnet.png, cka_sheet.png, cka_digits.json)
   and prints the numbers docs/evaluation.md quotes.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

# CLI output -> the names in docs/figures.
COPIES = {
    'cka_within_a.png': 'cka_vit.png',
    'cka_within_b.png': 'cka_resnet.png',
    'cka_between.png': 'cka_vit_vs_resnet.png',
    'cka_sheet.png': 'cka_sheet.png',
    'cka.json': 'cka_digits.json',
}


def command(module, *args):
  """Prints and runs `python -m module args`; its stdout."""
  line = [sys.executable, '-m', module, *args]
  print('$', ' '.join(['python'] + line[1:]), flush=True)
  return subprocess.run(
      line,
      check=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
  ).stdout


def train(config, workdir, steps, *extra):
  """Trains unless `workdir` already finished; the final evaluation."""
  if not os.path.exists(os.path.join(workdir, 'final_params.npz')):
    command(
        'vit_jax.main',
        f'--config={config}',
        f'--workdir={workdir}',
        f'--config.total_steps={steps}',
        f'--config.eval_every={steps}',
        f'--config.checkpoint_every={steps}',
        '--config.evals.fewshot.every=0',
        *extra,
    )
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [l for l in lines if 'eval/accuracy' in l][-1]


def summary(saved):
  """The numbers docs/evaluation.md's paragraph quotes, from cka.json."""
  out = {}
  for key in ('a', 'b'):
    model = saved['models'][key]
    within = np.array(model['within'])
    out[model['name']] = {
        'layers': model['labels'],
        'with_input': [r['cka'] for r in model['with_input']],
        'first_vs_last': within[0, -1],
        'adjacent_mean': float(np.mean(np.diag(within, 1))),
    }
  between = np.array(saved['between'])
  labels_a = saved['models']['a']['labels']
  labels_b = saved['models']['b']['labels']
  out['between'] = {
      'rows': labels_a,
      'cols': labels_b,
      # For each ViT layer, the ResNet layer it is most alike.
      'best_match': {
          labels_a[i]: (labels_b[int(j)], float(between[i, j]))
          for i, j in enumerate(between.argmax(1))
      },
      'last_vs_last': float(between[-1, -1]),
      'min': float(between.min()),
      'max': float(between.max()),
  }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/cka_digits')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--vit_blocks', type=int, default=6)
  parser.add_argument('--figures', default='docs/figures')
  args = parser.parse_args()
  vit, resnet = os.path.join(args.out, 'vit'), os.path.join(args.out, 'resnet')
  accuracy = {
      'vit': train(
          'configs/digits.py',
          vit,
          args.steps,
          f'--config.model.transformer.num_layers=' f'{args.vit_blocks}',
      ),
      'resnet': train('configs/digits_resnet.py', resnet, args.steps),
  }
  for name, final in accuracy.items():
    print(
        f'{name}: test accuracy {final["eval/accuracy"]:.4f} '
        f'(step {final["step"]})'
    )
  cka_dir = os.path.join(args.out, 'cka')
  command(
      'vit_jax.analysis',
      'cka',
      f'--workdir={vit}',
      f'--workdir_b={resnet}',
      '--images=digits',
      '--num_images=299',
      f'--out={cka_dir}',
  )
  os.makedirs(args.figures, exist_ok=True)
  for source, target in COPIES.items():
    shutil.copyfile(
        os.path.join(cka_dir, source), os.path.join(args.figures, target)
    )
  saved = json.load(open(os.path.join(cka_dir, 'cka.json')))
  print(json.dumps(summary(saved), indent=1))


if __name__ == '__main__':
  main()
