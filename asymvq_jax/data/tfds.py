"""TFDS image datasets as sources for the pipeline.

TensorFlow is an optional extra, imported only here and hidden from GPUs so that it never takes
accelerator memory. Images are read encoded and decoded with PIL by the pipeline, so TFDS and
folders share one decoding and augmentation. array_record datasets are read by index, like
folders (a resume costs nothing); tfrecord datasets (the TFDS default) are streamed, each host its
own even slice of the split, shuffled per epoch from (seed, epoch, host): a resume re-reads the
records before its step within the current epoch, undecoded.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterator

from asymvq_jax.data.masks import Stream, example_rng

log = logging.getLogger(__name__)

TFDS_PINS = "tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10"


def import_tfds():
    """Import tensorflow + tensorflow_datasets, hiding accelerators from TF."""
    try:
        import tensorflow as tf  # noqa: PLC0415
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "config.data.source='tfds' needs TensorFlow Datasets, an optional extra: "
            f"pip install 'asymvq-jax[tfds]'  (i.e. {TFDS_PINS})"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised / no such device type
        pass
    return tf, tfds


def _open_builder(name: str, data_dir: str | None):
    tf, tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends
        raise ValueError(
            f"TFDS dataset {name!r} (data_dir={data_dir!r}) cannot be opened: {e}"
        ) from e
    if not tf.io.gfile.exists(builder.data_dir) or not builder.info.splits:
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} "
            f"(looked in {builder.data_dir}); run builder.download_and_prepare() first"
        )
    return builder


class TfdsSource:
    """A TFDS split for one host. `random_access` tells which interface is valid.

    Random access: `len(src)`, `src.get(i) -> (encoded bytes, name)`.
    Streaming: `src.stream(start) -> iterator of (encoded bytes, name)` over this
    host's slice, starting at host example `start` (infinite, epoch after epoch),
    `src.host_len` examples per epoch.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        *,
        seed: int,
        process_index: int,
        process_count: int,
        image_key: str = "image",
        shuffle_buffer: int = 10_000,
    ):
        tf, tfds = import_tfds()
        self._tf, self._tfds = tf, tfds
        self.name, self.split, self.image_key = name, split, image_key
        self.seed, self.process_index = seed, process_index
        self.shuffle_buffer = shuffle_buffer
        self.builder = _open_builder(name, data_dir)
        try:
            n = self.builder.info.splits[split].num_examples
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"TFDS dataset {name!r} has no split {split!r} "
                f"(available: {list(self.builder.info.splits)})"
            ) from e
        if n == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
        if image_key not in self.builder.info.features:
            raise ValueError(
                f"TFDS dataset {name!r} has no feature {image_key!r} "
                f"(features: {list(self.builder.info.features)}); set config.data.image_key"
            )
        fmt = str(getattr(self.builder.info, "file_format", "") or "")
        self.random_access = "array_record" in fmt.lower()
        self.desc = f"tfds:{name}/{split}"
        if self.random_access:
            self._ds = self.builder.as_data_source(
                split=split, decoders={image_key: tfds.decode.SkipDecoding()}
            )
            self._len = len(self._ds)
        else:
            host_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[
                process_index
            ]
            self.host_split = host_split
            self.host_len = self.builder.info.splits[host_split].num_examples
            if self.host_len == 0:
                raise ValueError(
                    f"TFDS dataset {name!r} split {split!r} has {n} examples: too few "
                    f"for {process_count} hosts"
                )

    # -- random access ------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def get(self, i: int) -> tuple[bytes, str]:
        ex = self._ds[int(i)]
        return bytes(ex[self.image_key]), f"{self.desc}[{int(i)}]"

    # -- streaming ------------------------------------------------------------------
    def _epoch(self, epoch: int, skip: int):
        tf, tfds = self._tf, self._tfds
        eseed = int(
            example_rng(self.seed, Stream.TFDS_EPOCH, epoch, self.process_index).integers(2**31 - 1)
        )
        opts = tf.data.Options()
        opts.deterministic = True
        rc = tfds.ReadConfig(
            options=opts, shuffle_seed=eseed, try_autocache=False,
            shuffle_reshuffle_each_iteration=False,
        )
        ds = self.builder.as_dataset(
            split=self.host_split,
            shuffle_files=True,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
            read_config=rc,
        )
        ds = ds.map(lambda ex: ex[self.image_key])
        ds = ds.shuffle(
            min(self.shuffle_buffer, self.host_len), seed=eseed,
            reshuffle_each_iteration=False,
        )
        if skip:
            ds = ds.skip(skip)
        return ds.prefetch(64)

    def stream(self, start: int) -> Iterator[tuple[bytes, str]]:
        epoch, pos = divmod(int(start), self.host_len)
        for e in itertools.count(epoch):
            skip = pos if e == epoch else 0
            for k, b in enumerate(self._epoch(e, skip).as_numpy_iterator()):
                yield bytes(b), f"{self.desc}@host{self.process_index}/epoch{e}/{skip + k}"

