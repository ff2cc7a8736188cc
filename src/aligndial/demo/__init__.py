"""The embedded demo: alignment strength as a dial on tiny models trained by aligndial itself.

`task` (the arithmetic task and its scoring), `measure` (metrics of a λ-mixed model), `build`
(`aligndial demo build`), `show` (`aligndial demo`), `reproduce` (docs/reproduction.md).
"""
