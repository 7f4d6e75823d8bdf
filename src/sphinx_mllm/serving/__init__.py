"""L7 serving: the OpenAI-compatible HTTP server (`create_app`) and the Gradio web demo (`build_demo`).

`fastapi`/`uvicorn` (extra `serve`) and `gradio` (extra `demo`) are imported only by the modules that need
them, so `import sphinx_mllm.serving` works without either.
"""

from sphinx_mllm.serving.settings import ServerSettings

__all__ = ["ServerSettings", "build_demo", "create_app"]


def __getattr__(name: str):  # lazy: keep FastAPI and Gradio out of plain imports
    if name == "create_app":
        from sphinx_mllm.serving.app import create_app

        return create_app
    if name == "build_demo":
        from sphinx_mllm.serving.demo_ui import build_demo

        return build_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
