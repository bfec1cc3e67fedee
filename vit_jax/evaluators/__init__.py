"""Evaluators run during training (`config.evals`) and by `vit_jax.evaluate`.

* `classification`: top-1 / top-5 accuracy and loss on a padded split.
* `fewshot`: the paper's closed-form few-shot linear probe on frozen features.
* `imagenet_variants`: ImageNet-ReaL, -v2, -A, -R and -Sketch accuracy of a
  1000-way ImageNet head.
"""
