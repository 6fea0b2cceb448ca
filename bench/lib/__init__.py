"""The benches' library: workloads, metrics, reports, plots, server processes."""
