"""Start-up cost of an image folder: first start versus restart.

  python -m benchmarks.image_folder_index [--num_images 4000] [--classes 10]
      [--width 500] [--height 375] [--folder DIR] [--no-full_decode]

Builds `input_pipeline.ImageFolderSource` on a folder of JPEGs (generated in
a temporary directory unless --folder is given: photo-sized smooth colour
fields with noise, about 80 KB each, like ImageNet's) and prints the seconds
of

  * the first start (no index: every file is listed, stat'ed and checked),
  * a restart (the index holds every file: listing and stat'ing only),
  * a restart after one file changed (that file is checked again),
  * for comparison, decoding every file fully in 8 threads (what every start
    did before the index),

each also scaled to 100,000 images. The files are in the page cache (just
written, or read by the previous step): a first start from a cold disk or a
network file system adds the time to read them.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from vit_jax import input_pipeline
from vit_jax.datasets import folder_index


def make_jpeg_folder(root, num_images, classes, width, height):
  """Writes `num_images` JPEGs of smooth colour fields with noise."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for i in range(num_images):
    folder = os.path.join(root, f'class_{i % classes:03d}')
    os.makedirs(folder, exist_ok=True)
    coarse = rng.uniform(0, 255, size=(height // 25 + 2, width // 25 + 2, 3))
    image = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize(
            (width, height), Image.BICUBIC
        ),
        np.float32,
    )
    image += rng.normal(0, 12, image.shape)  # Texture: photo-like sizes.
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'{i:07d}.jpg'), quality=92
    )


def full_decode(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    image.load()


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=4000)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--width', type=int, default=500)
  parser.add_argument('--height', type=int, default=375)
  parser.add_argument(
      '--folder',
      help='an existing image folder to time '
      '(its index is deleted and rewritten)',
  )
  parser.add_argument('--restarts', type=int, default=3)
  parser.add_argument(
      '--full_decode', action=argparse.BooleanOptionalAction, default=True
  )
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = args.folder or os.path.join(tmp, 'images')
    if not args.folder:
      print(
          f'Writing {args.num_images:,} {args.width}x{args.height} JPEGs '
          f'in {args.classes} classes...',
          flush=True,
      )
      make_jpeg_folder(
          root, args.num_images, args.classes, args.width, args.height
      )
    index = os.path.join(root, folder_index.INDEX_NAME)
    if os.path.exists(index):
      os.remove(index)
    source = None

    def build():
      nonlocal source
      source = input_pipeline.ImageFolderSource(root, write_index=True)

    first = timed(build)
    paths = sorted(p for f in source.files.values() for p, _ in f)
    n = len(paths)
    megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
    restarts = [timed(build) for _ in range(args.restarts)]
    os.utime(paths[0])  # A new mtime: checked again.
    changed = timed(build)
    rows = [
        ('first start (check all, write index)', first),
        (
            'restart (index, median of ' f'{args.restarts})',
            statistics.median(restarts),
        ),
        ('restart after 1 file changed', changed),
    ]
    if args.full_decode:
      import concurrent.futures  # pylint: disable=g-import-not-at-top

      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows.append(
            (
                'full decode of every file, 8 threads (before)',
                timed(lambda: list(pool.map(full_decode, paths))),
            )
        )
    print(
        f'{n:,} images ({megabytes / n * 1e3:.0f} KB each on average), '
        f'{os.cpu_count()} CPUs, index '
        f'{os.path.getsize(index) / n:.0f} bytes per image.'
    )
    print(
        f'{"":48s} {"seconds":>9s} {"s / 100k images":>16s} '
        f'{"images/s":>10s}'
    )
    for name, seconds in rows:
      print(
          f'{name:48s} {seconds:9.2f} {seconds * 1e5 / n:16.1f} '
          f'{n / seconds:10,.0f}'
      )


if __name__ == '__main__':
  main()
