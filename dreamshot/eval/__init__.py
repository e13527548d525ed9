"""Storyboard evaluation (DESIGN §3, EVAL.md), in three layers:

1. frozen feature extractors sharing `forward(images) -> features` (`extractors`, `faces`, `detector`), built
   from local weight files named in `cfg.eval`;
2. pure metric functions on features (`metrics`): cosine matrices, Hungarian assignment, self / cross, per-story
   then per-benchmark means;
3. torchmetrics `Metric` classes (`story_metrics`) that call 1 and 2 story by story, a Lightning callback
   (`callback`) and the runner behind `dreamshot eval` (`runner`) that only generate, call them and log.

Heavy libraries (open_clip, insightface, transformers' vision models) are imported where a model is built, so
importing this package (as training does for its callback) stays cheap.
"""
