"""Storyboard evaluation (DESIGN §3, EVAL.md, docs/evaluation.md), in three layers:

1. frozen feature extractors called as `encoder(images) -> features` (`extractors`, `faces`, `detector`), built
   from local weight files named in `cfg.eval`;
2. pure metric functions on features (`metrics`): cosine matrices, Hungarian assignment, self / cross, per-story
   then per-benchmark means;
3. torchmetrics `Metric` classes (`story_metrics`, assembled by `suite`) that call 1 and 2 story by story, and
   the runner behind `dreamshot eval` (`runner`) and the training callback (`callback`), which only generate,
   call them and log.

Around them: benchmark loaders (`benchmarks`), character crops and matching (`crops`, `identity`), the alignment
judge (`judge`), shots drawn or read (`generation`), the published rows and the results files (`published`,
`report`). Heavy libraries (open_clip, insightface, transformers' vision models) are imported where a model is
built, so importing the training callback stays cheap.
"""
