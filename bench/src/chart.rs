//! The SVG chart of a workload run (being written).
