"""capjax entry point at a checkout's root: the same command as the installed `capjax` (capjax/main.py
holds the flags and the dispatch; nothing else lives here).

  python launch.py                                            # demo: train on built-in shapes data
  python launch.py --config=configs/default.py --workdir=W    # train (resumes if W has checkpoints)
  python launch.py --mode=prepare --config=configs/flickr8k.py --config.data.manual_dir=/data/flickr8k
  python launch.py --mode=eval --workdir=W --split=test --beam_size=3 --checkpoint_step=best
  python launch.py --mode=caption --workdir=W --images='photos/*.jpg' --output=captions.jsonl
  python launch.py --mode=compare --workdirs=W1,W2 --split=test --beam_size=3   # one report, two models
  python launch.py --mode=serve --workdir=W --port=8000                          # web page + JSON API
  python launch.py --mode=export --workdir=W --export_dir=E     # weights + serialized captioning function
"""

from capjax import main

if __name__ == '__main__':
  main.run()
