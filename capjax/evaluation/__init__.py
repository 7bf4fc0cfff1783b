"""Evaluating captioners: one module per job. Importing the package imports none of them, so training
pulls in only what it uses (`loss`, `captioning`, `content_score`'s word classes), never the report.

  loss             a split's teacher-forced loss, overall and by word class
  captioning       how captions are decoded (`DecodeSettings`), captioning a split, per-epoch scores
  metrics          coco-caption metrics through pycocoevalcap: one tokenizer run, each scorer once
  cider            the vectorised CIDEr-D that SCST's reward uses
  caption_analysis per-image scores, paper-style BLEU, collapse detectors
  content_score    the demo data's content score: are the named objects really there, and where
  provenance       what an evaluation's numbers depend on
  analysis         `Evaluation`: all of the above for one set of captions, its JSON and report payload
  evaluator        `evaluate`: model -> captions -> `Evaluation` (end of training, eval, compare)
  outputs          the files an evaluation writes and the summary it prints
  comparison       two evaluations of the same images side by side
  modes            `--mode=eval` and `--mode=compare`
  report, markup   the HTML reports and their building blocks (static/report.css)
  attention_figures word-by-word attention figures (caption mode's PNGs, the report's maps)
"""
