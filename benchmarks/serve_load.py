r"""Serve-mode load test: N concurrent clients against a real `launch.py --mode=serve` on localhost, vs the
same images captioned one by one through the API.

  python launch.py                                   # once: trains workdirs/demo (the demo model)
  python -m benchmarks.serve_load                    # 16 clients against workdirs/demo
  python -m benchmarks.serve_load --workdir=W --clients=32 --requests=512

Without a model in --workdir (default workdirs/demo) the script first trains configs/tiny.py into a
temporary directory (about 2 minutes on 2 cores) and says so in the JSON (`model`).

For greedy and beam-search decoding (--beam_size), two runs against one server process:
- `one by one`: a single client sends --sequential_requests requests, one image each, each after the
  previous answer: what captioning images one at a time through the API gives.
- `N clients`: --clients clients each send one-image requests back to back, --requests in all: the
  server's dynamic batching puts concurrent requests into one jitted call.
Each run reports requests/s (= images/s), p50/p99 latency, the batch sizes the server saw (from
/healthz) and the server's peak resident memory (VmHWM, so far in its life). Every run is bounded by
--max_seconds. The images are 500x375 JPEGs (harness.flickr_like_records): decoding them is part of
the work, as with real uploads. Clients and server share the machine's cores; `server_cores` and
`client_cores` say how much each used, `others_cores` what other processes did.
"""

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as `python benchmarks/serve_load.py`
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
import httpx
import numpy as np

from benchmarks import harness
from capjax import train
from configs import tiny

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Only when this file runs as the program: absl flags are process-global and the benchmarks import
  # one another (benchmarks/harness.py, "Flags").
  flags.DEFINE_string('workdir', 'workdirs/demo', 'The served model; without checkpoints there, '
                      'configs/tiny.py is trained into a temporary directory first.')
  flags.DEFINE_integer('clients', 16, 'Concurrent clients of the batched runs.')
  flags.DEFINE_integer('requests', 256, 'Requests (one image each) of each batched run.')
  flags.DEFINE_integer('sequential_requests', 48, 'Requests of each one-by-one run.')
  flags.DEFINE_integer('beam_size', 3, 'The server\'s --beam_size (it also serves greedy).')
  flags.DEFINE_integer('max_batch_size', 16, 'The server\'s --max_batch_size.')
  flags.DEFINE_float('max_wait_ms', 10.0, 'The server\'s --max_wait_ms.')
  flags.DEFINE_float('max_seconds', 60.0, 'Each run stops sending requests after this long.')
  flags.DEFINE_integer('num_images', 32, 'Distinct test images (sent round robin).')
  flags.DEFINE_string('output', None, 'JSON path; default benchmarks/results/serve_load.json.')


def has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def train_tiny_model(base: str) -> tuple[str, dict]:
  """configs/tiny.py trained into `base`/workdir (its data into `base`/data): a model to serve."""
  config = tiny.get_config()
  config.data.data_dir = os.path.join(base, 'data')
  workdir = os.path.join(base, 'workdir')
  print('No model in --workdir: training configs/tiny.py into a temporary directory first.', flush=True)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  return workdir, {'trained_here': 'configs/tiny.py', 'train_seconds': round(time.perf_counter() - start),
                   'steps': int(result.state.step)}


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def start_server(workdir: str, port: int, log_path: str, *, beam_size: int, max_batch_size: int,
                 max_wait_ms: float) -> subprocess.Popen:
  command = [sys.executable, 'launch.py', '--mode=serve', f'--workdir={workdir}', f'--port={port}',
             f'--beam_size={beam_size}', '--checkpoint_step=latest',
             f'--max_batch_size={max_batch_size}', f'--max_wait_ms={max_wait_ms}']
  with open(log_path, 'w') as log:
    return subprocess.Popen(command, cwd=harness.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(url: str, server: subprocess.Popen, log_path: str, timeout_s: float = 900) -> float:
  start = time.perf_counter()
  while time.perf_counter() - start < timeout_s:
    if server.poll() is not None:
      raise RuntimeError(f'the server exited ({server.returncode}):\n{open(log_path).read()[-3000:]}')
    try:
      if httpx.get(f'{url}/healthz', timeout=2).status_code == 200:
        return time.perf_counter() - start
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  raise RuntimeError(f'the server did not answer within {timeout_s} s')


def process_facts(pid: int) -> dict:
  """Resident memory now and at its peak (MB), and CPU seconds used, of process `pid`."""
  facts = {}
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('VmRSS', 'VmHWM'):
        facts[key] = int(value.split()[0]) / 1024
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  facts['cpu_s'] = (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  return facts


async def send_requests(url: str, images: list[tuple[str, bytes]], *, clients: int, requests: int,
                        beam_size: int) -> dict:
  """`clients` loops each sending one-image requests back to back until `requests` are sent or
  --max_seconds pass. Returns the latencies (s), the wall time and the failures."""
  latencies, failures, sent = [], [], 0
  deadline = time.perf_counter() + FLAGS.max_seconds
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

    async def client():
      nonlocal sent
      while sent < requests and time.perf_counter() < deadline:
        name, data = images[sent % len(images)]
        sent += 1
        start = time.perf_counter()
        response = await http.post(f'/v1/captions?beam_size={beam_size}',
                                   files=[('images', (name, data, 'image/jpeg'))])
        latencies.append(time.perf_counter() - start)
        if response.status_code != 200:
          failures.append(response.text[:200])

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {'latencies': latencies, 'wall_s': time.perf_counter() - start, 'failures': failures}


def measure(url: str, pid: int, images, *, label: str, clients: int, requests: int, beam_size: int) -> dict:
  stats_before = httpx.get(f'{url}/healthz').json()['batching']
  server_before, load = process_facts(pid), harness.LoadMonitor()
  result = asyncio.run(send_requests(url, images, clients=clients, requests=requests, beam_size=beam_size))
  load, server_after = load.report(), process_facts(pid)
  stats_after = httpx.get(f'{url}/healthz').json()['batching']
  latencies = np.asarray(result['latencies'])
  calls = stats_after['calls'] - stats_before['calls']
  sizes = {size: count - stats_before['batch_sizes'].get(size, 0)
           for size, count in stats_after['batch_sizes'].items()}
  server_cores = (server_after['cpu_s'] - server_before['cpu_s']) / result['wall_s']
  row = {'mode': label, 'clients': clients, 'requests': len(latencies),
         'requests_per_s': len(latencies) / result['wall_s'],
         'p50_ms': 1e3 * float(np.percentile(latencies, 50)),
         'p99_ms': 1e3 * float(np.percentile(latencies, 99)),
         'mean_batch': (stats_after['images'] - stats_before['images']) / max(calls, 1),
         'batch_sizes': {s: n for s, n in sizes.items() if n}, 'jitted_calls': calls,
         'server_peak_rss_mb': server_after['VmHWM'], 'server_rss_mb': server_after['VmRSS'],
         'server_cores': server_cores, 'client_cores': load['own_cores'],
         'others_cores': max(load['others_cores'] - server_cores, 0.0),
         'wall_s': result['wall_s'], 'failures': len(result['failures'])}
  if result['failures']:
    print(f'  {label}: {len(result["failures"])} failed requests, e.g. {result["failures"][0]}')
  print(f"  {label}: {row['requests_per_s']:.1f} requests/s, p50 {row['p50_ms']:.0f} ms, "
        f"p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f}", flush=True)
  return row


def main(argv):
  harness.start(argv)
  logging.getLogger('httpx').setLevel(logging.WARNING)  # a line per request otherwise
  tmp = tempfile.TemporaryDirectory(prefix='capjax-serve-load-')
  workdir, model = FLAGS.workdir, {'workdir': os.path.abspath(FLAGS.workdir)}
  if not has_checkpoints(workdir):
    workdir, trained = train_tiny_model(tmp.name)
    model = {'workdir': workdir, **trained}
  images = [(r['image_id'], r['image']) for r in harness.flickr_like_records(FLAGS.num_images)]
  before = harness.idle_check()
  print(f'before the run: {harness.describe_load(before)}')
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  log_path = os.path.join(tmp.name, 'server.log')
  server = start_server(workdir, port, log_path, beam_size=FLAGS.beam_size,
                        max_batch_size=FLAGS.max_batch_size, max_wait_ms=FLAGS.max_wait_ms)
  rows = []
  try:
    startup_s = wait_until_serving(url, server, log_path)
    served = httpx.get(f'{url}/v1/model').json()
    model.update({k: served[k] for k in ('step', 'dataset', 'config', 'vocab_size', 'validation')})
    print(f"Serving step {served['step']} of {workdir} ({startup_s:.0f} s to load and compile).")
    monitor, server_start = harness.LoadMonitor(), process_facts(server.pid)
    for beam_size in (1, FLAGS.beam_size):
      name = 'greedy' if beam_size == 1 else f'beam-{beam_size}'
      # Connections, first-call effects: not timed.
      asyncio.run(send_requests(url, images, clients=4, requests=8, beam_size=beam_size))
      one_by_one = measure(url, server.pid, images, label=f'{name}, one by one', clients=1,
                           requests=FLAGS.sequential_requests, beam_size=beam_size)
      batched = measure(url, server.pid, images, label=f'{name}, {FLAGS.clients} clients',
                        clients=FLAGS.clients, requests=FLAGS.requests, beam_size=beam_size)
      batched['speedup'] = batched['requests_per_s'] / one_by_one['requests_per_s']
      rows += [one_by_one, batched]
    load = monitor.report()
    # The server is this process's child but not yet reaped: LoadMonitor counts it among the others.
    load['server_cores'] = round((process_facts(server.pid)['cpu_s'] - server_start['cpu_s'])
                                 / load['wall_s'], 2)
    load['others_cores'] = round(max(load['others_cores'] - load['server_cores'], 0.0), 2)
    load['busy'] = load['others_cores'] > harness.BUSY_CORES
  finally:
    server.send_signal(signal.SIGTERM)
    shutdown_start = time.perf_counter()
    exit_code = server.wait(timeout=120)
    shutdown_s = time.perf_counter() - shutdown_start
  print()
  harness.print_table(rows, ['mode', 'requests', 'requests_per_s', 'speedup', 'p50_ms', 'p99_ms',
                             'mean_batch', 'server_peak_rss_mb', 'server_cores', 'client_cores',
                             'others_cores'])
  print(f'\nmodel: {model}\nserver: exit code {exit_code} {shutdown_s:.1f} s after SIGTERM\n'
        f'{harness.machine_info()}\n{harness.describe_load(load)}')
  harness.write_json(FLAGS.output or harness.default_output(__file__), {
      'benchmark': 'serve_load', 'argv': sys.argv, 'machine': harness.machine_info(), 'model': model,
      'server': {'beam_size': FLAGS.beam_size, 'max_batch_size': FLAGS.max_batch_size,
                 'max_wait_ms': FLAGS.max_wait_ms, 'startup_s': startup_s, 'exit_code': exit_code,
                 'shutdown_s': shutdown_s},
      'images': f'{len(images)} JPEGs of 500x375 (harness.flickr_like_records), one per request',
      'load_before': before, 'load_during': load, 'rows': rows})
  tmp.cleanup()


if __name__ == '__main__':
  define_flags()
  app.run(main)
