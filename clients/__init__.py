"""HTTP clients of longrope-serve: OpenAI SDK helpers, the admin client, load generator, benchmarks."""
