"""Models and helpers shared by effopt's tests, examples and benchmarks."""
