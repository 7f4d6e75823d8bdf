"""L5: foreign checkpoint layouts: the official SPHINX release folders (`consolidated.NN-of-MM.model.pth`).

Importing this package registers the release-folder reader with
`SphinxForConditionalGeneration.from_pretrained`, so a release folder loads like any other checkpoint.
"""

from sphinx_mllm.formats.loader import EXTRA_CONFIG_FILE, from_pretrained_hook, load_release_model
from sphinx_mllm.formats.release import ReleaseCheckpoint, is_release_folder, split_kind
from sphinx_mllm.formats.writer import release_llama_type, save_release
from sphinx_mllm.modeling import register_checkpoint_reader

register_checkpoint_reader(is_release_folder, from_pretrained_hook)

__all__ = [
    "EXTRA_CONFIG_FILE", "ReleaseCheckpoint", "is_release_folder", "load_release_model", "release_llama_type",
    "save_release", "split_kind",
]
