"""The dataset construction pipeline of the paper's appendix A (DESIGN §4): videos to storyboard groups.

One module per stage (curation, shots, keyframes, quality, grouping, roles), the model-backed parts behind
interfaces with offline backends (backends, overlay, vlm), and the resumable driver (pipeline, state,
report). `toyvideo` renders toy-world videos with known cuts, motion and blur for tests and benchmarks.
"""
