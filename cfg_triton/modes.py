"""The three guidance semantics, as the integers the kernels and the op take."""
RAW, NORMALIZED, INTERPOLATED = 0, 1, 2
