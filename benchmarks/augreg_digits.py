"""Position embeddings and the AugReg recipe on digits, several seeds.

  python -m benchmarks.augreg_digits [--out /tmp/augreg_digits]
      [--seeds 0,1,2] [--steps 400] [--labelled 300] [--parts posemb,recipe]

(a) posemb: the paper's Appendix D.4 study (Table 8) at digits scale: the
    digits model (configs/digits.py) trained from scratch on the whole
    training split with each `posemb` ('none', 'learn', 'learn2d',
    'sincos2d'), the same steps and seeds.
(b) recipe: scratch training on the first `--labelled` training images with
    and without the AugReg recipe (RandAugment (2, 10), Mixup 0.2,
    stochastic depth 0.1), the same steps and seeds.

Every run is a plain `python -m vit_jax.main` command (printed); a run whose
workdir already holds final_params.npz is read, not repeated. Prints test
accuracy per setting (mean, spread = max - min over seeds, and each seed)
and writes results.json.
"""

import argparse
import json
import os

from benchmarks.mpp_digits import run

POSEMBS = ('none', 'learn', 'learn2d', 'sincos2d')
RECIPE = (
    '--config.pp.randaugment=(2, 10)',
    '--config.mixup_alpha=0.2',
    '--config.model.stochastic_depth=0.1',
)


def _common(steps, seed):
  return [
      '--config=configs/digits.py',
      f'--config.total_steps={steps}',
      f'--config.warmup_steps={max(1, steps // 10)}',
      f'--config.eval_every={steps}',
      f'--config.checkpoint_every={steps}',
      '--config.evals.fewshot.every=0',
      f'--config.seed={seed}',
  ]


def _row(name, accuracies):
  values = [a for _, a in accuracies]
  mean = sum(values) / len(values)
  spread = max(values) - min(values)
  seeds = ', '.join(f'{a:.4f}' for _, a in accuracies)
  print(f'{name:<28} {mean:.4f} ± {spread / 2:.4f}   ({seeds})', flush=True)
  return {
      'setting': name,
      'mean': mean,
      'spread': spread,
      'per_seed': dict(accuracies),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/augreg_digits')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--labelled', type=int, default=300)
  parser.add_argument('--parts', default='posemb,recipe')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  parts = args.parts.split(',')
  table = {}
  for part in parts:
    settings = (
        [(f'posemb={p}', [f'--config.model.posemb={p}']) for p in POSEMBS]
        if part == 'posemb'
        else [
            (f'{args.labelled} images, plain', []),
            (f'{args.labelled} images, AugReg', list(RECIPE)),
        ]
    )
    for name, extra in settings:
      accuracies = []
      for seed in seeds:
        workdir = os.path.join(
            args.out,
            part,
            name.replace(' ', '_').replace(',', ''),
            f'seed{seed}',
        )
        split = (
            [f'--config.train_split=train[:{args.labelled}]']
            if part == 'recipe'
            else []
        )
        final = run(_common(args.steps, seed) + split + extra, workdir)
        accuracies.append((seed, final['eval/accuracy']))
      table.setdefault(part, []).append((name, accuracies))
  print(f'\n{"setting":<28} test accuracy: mean ± half-range (per seed)')
  results = {}
  for part, rows in table.items():
    print(f'-- {part}, {args.steps} steps, seeds {args.seeds}')
    results[part] = [_row(name, accuracies) for name, accuracies in rows]
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(
        {
            'steps': args.steps,
            'labelled': args.labelled,
            'seeds': seeds,
            'results': results,
        },
        f,
        indent=1,
    )


if __name__ == '__main__':
  main()
