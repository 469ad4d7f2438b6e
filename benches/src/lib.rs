//! Benchmarks live here (fio job files and the runner come with the benchmark issue).
