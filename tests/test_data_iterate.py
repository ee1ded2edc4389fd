"""iterate_batches: device placement/sharding, resume, prefetch thread lifecycle."""

import gc
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from jdiff.data import ArraySource, BatchIterator, DataError, ImageFolderSource, batch_at, iterate_batches


def _source(n=40):
    img = np.zeros((n, 4, 4, 1), np.float32)
    img[..., 0] = np.arange(n)[:, None, None] / n
    img[:, :, 0] -= 1  # asymmetric in width, so flips are visible
    return ArraySource(img, np.arange(n) % 5)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "jdiff-data-prefetch" and t.is_alive()]


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()), ("data",))


def _check_equal(batch, expected):
    for k in ("image", "label"):
        np.testing.assert_array_equal(np.asarray(batch[k]), expected[k])


def test_sharded_values_match_batch_at(mesh):
    src, n_dev = _source(), len(jax.devices())
    bs = 4 * n_dev
    sharding = NamedSharding(mesh, P("data"))
    kw = dict(global_batch_size=bs, seed=11, random_flip=True)
    with iterate_batches(src, start_step=3, num_steps=4, sharding=sharding, **kw) as it:
        batches = list(it)
    assert len(batches) == 4
    for step, batch in zip(range(3, 7), batches):
        assert isinstance(batch["image"], jax.Array)
        assert batch["image"].shape == (bs, 4, 4, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (bs,) and batch["label"].dtype == np.int32
        assert batch["image"].sharding.is_equivalent_to(sharding, 4)
        assert batch["label"].sharding.is_equivalent_to(sharding, 1)
        assert len(batch["image"].addressable_shards) == n_dev
        _check_equal(batch, batch_at(src, step, **kw))
    assert not _prefetch_threads()


def test_replicated_and_per_key_shardings(mesh):
    src = _source()
    replicated = NamedSharding(mesh, P())
    shardings = {"image": NamedSharding(mesh, P("data", None, None, None)), "label": NamedSharding(mesh, P("data"))}
    bs = 2 * len(jax.devices())
    for sharding in (replicated, shardings):
        with iterate_batches(src, global_batch_size=bs, seed=0, num_steps=2, sharding=sharding) as it:
            for step, batch in enumerate(it):
                _check_equal(batch, batch_at(src, step, global_batch_size=bs, seed=0))
    with pytest.raises(ValueError, match="sharding"):
        iterate_batches(src, global_batch_size=bs, seed=0, sharding={"image": replicated})


@pytest.mark.skipif(len(jax.devices()) == 1, reason="needs > 1 device")
def test_indivisible_batch_raises(mesh):
    with pytest.raises(ValueError, match="global_batch_size"):
        iterate_batches(
            _source(), global_batch_size=len(jax.devices()) + 1, seed=0, sharding=NamedSharding(mesh, P("data"))
        )


@pytest.mark.parametrize("prefetch", [0, 3])
def test_unsharded_resume_equivalence(prefetch):
    src = _source(13)
    kw = dict(global_batch_size=4, seed=2, prefetch=prefetch)
    full = list(iterate_batches(src, num_steps=8, **kw))
    first = list(iterate_batches(src, num_steps=3, **kw))
    rest = iterate_batches(src, start_step=3, **kw)  # infinite; stopped by close()
    resumed = first + [next(rest) for _ in range(5)]
    assert rest.step == 8
    rest.close()
    for step, (a, b) in enumerate(zip(full, resumed)):
        assert isinstance(a["image"], jax.Array)
        _check_equal(a, {k: np.asarray(v) for k, v in b.items()})
        _check_equal(a, batch_at(src, step, global_batch_size=4, seed=2))
    with pytest.raises(StopIteration):
        next(rest)
    assert not _prefetch_threads()


def test_thread_stops_on_break_and_garbage_collection():
    src = _source()
    it = iterate_batches(src, global_batch_size=8, seed=0, prefetch=2)
    next(it)
    assert len(_prefetch_threads()) == 1
    del it
    gc.collect()
    assert not _prefetch_threads()
    for _ in iterate_batches(src, global_batch_size=8, seed=0):
        break  # the generator-free iterator is dropped here
    gc.collect()
    assert not _prefetch_threads()


class _FailingSource(ArraySource):
    def __init__(self, fail_on_call):
        super().__init__(np.zeros((10, 2, 2, 1), np.float32))
        self.calls, self.fail_on_call = 0, fail_on_call

    def get(self, indices):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise OSError("corrupt file")
        return super().get(indices)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_producer_exception_propagates(prefetch):
    it = iterate_batches(_FailingSource(3), global_batch_size=2, seed=0, prefetch=prefetch)
    next(it), next(it)
    with pytest.raises(OSError, match="corrupt file"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert not _prefetch_threads()


def test_image_changed_on_disk_raises_data_error_through_prefetch(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((4, 4), 60 * i, np.uint8), "L").save(tmp_path / f"{i}.png")
    src = ImageFolderSource(tmp_path, 4, 1)
    (tmp_path / "2.png").write_bytes(b"overwritten after the start-up check")
    with iterate_batches(src, global_batch_size=4, seed=0, prefetch=2) as it:
        with pytest.raises(DataError, match=r"2\.png"):  # the first batch holds every file
            next(it)
    assert not _prefetch_threads()


def test_batch_iterator_validation():
    with pytest.raises(ValueError, match="prefetch"):
        BatchIterator(lambda s: s, prefetch=-1)
    assert list(BatchIterator(lambda s: s * 10, start_step=2, num_steps=3, prefetch=1)) == [20, 30, 40]


def test_close_from_another_thread_ends_a_waiting_consumer():
    def slow(step):
        time.sleep(0.2)
        return step

    it = BatchIterator(slow, prefetch=1)
    seen = []
    consumer = threading.Thread(target=lambda: seen.extend(it))  # blocks in next() while the producer sleeps
    consumer.start()
    time.sleep(0.05)
    it.close()
    consumer.join(5)
    assert not consumer.is_alive() and seen == list(range(len(seen)))
    assert not _prefetch_threads()


def test_open_iterator_does_not_hang_interpreter_exit():
    code = (
        "import time, numpy as np\n"
        "from jdiff.data import ArraySource, iterate_batches\n"
        "src = ArraySource(np.zeros((64, 4, 4, 1), np.float32))\n"
        "it = iterate_batches(src, global_batch_size=8, seed=0, prefetch=2)\n"
        "next(it)\n"
        "time.sleep(0.1)  # the producer now blocks on the full queue\n"
        "print('done')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
