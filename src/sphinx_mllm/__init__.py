"""sphinx-mllm: SPHINX multimodal LLMs (mixed weights, tasks, visual embeddings and scales).

The library is Hugging Face-native: `SphinxConfig`, `SphinxForConditionalGeneration` and
`SphinxProcessor` register with the transformers Auto classes on import of
`sphinx_mllm.modeling` / `sphinx_mllm.processing`.
"""

__version__ = "0.1.0"
