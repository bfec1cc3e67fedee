"""Starts N local CPU processes that form one JAX job, to rehearse a pod run.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
      python -m vit_jax.main --config=configs/digits.py:runlocal \\
      --workdir=/tmp/run

Each process gets `--coordinator_address=127.0.0.1:<free port>
--num_processes=N --process_id=i` appended and
`XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>`;
`vit_jax.main` then calls `jax.distributed.initialize` and uses gloo for CPU
collectives. Output of process i goes to stdout prefixed with `[i]` (and to
`--log_dir/process_<i>.log` if given). Exits with the first non-zero exit
code.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(
    command: list[str],
    num_processes: int,
    devices_per_process: int,
    log_dir: str | None = None,
) -> int:
  """Runs `command` N times as one multi-process JAX job; returns exit code."""
  port = free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count=' f'{devices_per_process}'
  )
  env.setdefault('JAX_PLATFORMS', 'cpu')
  procs, threads = [], []
  for i in range(num_processes):
    args = command + [
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={num_processes}',
        f'--process_id={i}',
    ]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = (
        open(os.path.join(log_dir, f'process_{i}.log'), 'w')
        if log_dir
        else None
    )

    def pump(proc=proc, i=i, log=log):
      for line in proc.stdout:
        sys.stdout.write(f'[{i}] {line}')
        if log:
          log.write(line)
      if log:
        log.close()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    procs.append(proc)
    threads.append(thread)
  codes = [p.wait() for p in procs]
  for t in threads:
    t.join()
  return next((c for c in codes if c), 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--log_dir', default=None)
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
  sys.exit(
      launch(
          command, args.num_processes, args.devices_per_process, args.log_dir
      )
  )


if __name__ == '__main__':
  main()
