"""TFDS builders for the two data sets that ship with every install (no download).

- `digits`: the 1,797 8x8 handwritten digits bundled with scikit-learn.
- `pysource`: the Python standard library's source files of the running interpreter.

They live in a package module (not a script) because TFDS looks builders up by their
code path. They write ArrayRecord files, so they need no TensorFlow.
"""

import hashlib
import pathlib
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits (pixel values 0-16 scaled to 0-255), fixed 80/20 split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # A Tensor, not an Image feature: encoding PNGs would need TensorFlow.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits

        digits = load_digits()
        # A fixed permutation (seed 0) so the split never depends on file order.
        order = np.random.default_rng(0).permutation(len(digits.target))
        num_test = len(order) // 5
        return {
            "train": self._generate_examples(digits, order[num_test:]),
            "test": self._generate_examples(digits, order[:num_test]),
        }

    def _generate_examples(self, digits, indices):
        for i in indices:
            image = np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)[..., None]
            yield int(i), {"image": image, "label": int(digits.target[i])}


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The running interpreter's standard-library `.py` files (no site-packages), sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    return root, files


def is_validation_file(relative_path: str) -> bool:
    """About 5% of files, chosen by a stable hash of the path (not by Python's hash())."""
    digest = hashlib.md5(relative_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 20 == 0


class Pysource(tfds.core.GeneratorBasedBuilder):
    """The bytes of the running Python's standard-library source files, split by file."""

    VERSION = tfds.core.Version("1.0.0")
    # One config per Python version: the standard library differs between them.
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=f"py{sys.version_info[0]}.{sys.version_info[1]}")
    ]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "path": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        root, files = stdlib_files()
        relative = [str(p.relative_to(root)) for p in files]
        train = [(r, p) for r, p in zip(relative, files, strict=True) if not is_validation_file(r)]
        val = [(r, p) for r, p in zip(relative, files, strict=True) if is_validation_file(r)]
        return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

    def _generate_examples(self, files):
        for relative, path in files:
            yield relative, {"text": path.read_bytes(), "path": relative}
