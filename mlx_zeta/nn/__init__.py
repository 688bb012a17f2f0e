"""Building blocks on mlx.nn, one file per layer family."""
