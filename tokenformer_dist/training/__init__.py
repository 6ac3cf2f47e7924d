"""The training loop and its pieces: the command line (`cli`), the loop (`trainer`), optimizer (`optim`),
learning-rate schedule (`schedule`), preemption signals (`preemption`), CPU allocator tuning (`allocator`),
logged metrics (`metrics`) and the profiler (`profiling`)."""
