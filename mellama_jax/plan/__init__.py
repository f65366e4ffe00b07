"""Planning a run before it starts: each layout compiled ahead of time (memory per device), on simulated
CPU devices or a TPU topology's abstract chips (`layouts`, `tpu`), and the search over layouts, accumulations
and remat policies that ranks them by step time (`search`)."""
