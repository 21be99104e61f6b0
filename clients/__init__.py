"""HTTP clients of longrope-serve: OpenAI SDK helpers, the admin client, load generator, benchmarks.

``clients.client`` and ``clients.cli`` need only the base install (httpx, pydantic, openai,
prometheus-client): importing them loads no torch, matplotlib or vLLM (tests/unit/test_client_imports.py).
The benchmarks (``longrope-client bench``) also need the ``factors`` and ``plot`` extras."""
