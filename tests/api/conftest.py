from engine.conftest import set_files, tiny_llama  # noqa: F401  (session fixtures shared with engine tests)
