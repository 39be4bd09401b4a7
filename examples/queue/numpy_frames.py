"""Zero-copy numpy frames: a camera-like producer and an analysing consumer.

The producer renders each frame straight into the ring with put_view (no
intermediate buffer); the consumer maps the frame with get_view and
numpy.frombuffer (no copy) and computes its mean inside the with-block.

    python examples/queue/numpy_frames.py
"""

from __future__ import annotations

import multiprocessing

import numpy as np

import shmq
from shmq.testing import unique_name

SHAPE = (480, 640)
FRAMES = 200


def camera(name: str) -> None:
    q = shmq.Queue(name)
    for i in range(FRAMES):
        with q.put_view(SHAPE[0] * SHAPE[1] * 2, timeout=30) as buf:
            frame = np.frombuffer(buf, dtype=np.uint16).reshape(SHAPE)
            frame[:] = i  # render in place, directly in shared memory
            del frame  # no reference may outlive the with-block
    q.close()


def main() -> None:
    name = unique_name("frames")
    with shmq.Queue(name, create=True, kind="spsc", capacity=1 << 22) as q:
        child = multiprocessing.get_context("spawn").Process(target=camera, args=(name,))
        child.start()
        means = []
        for _ in range(FRAMES):
            with q.get_view(timeout=30) as view:
                frame = np.frombuffer(view, dtype=np.uint16).reshape(SHAPE)
                means.append(float(frame.mean()))
                del frame
        child.join(timeout=30)
    assert means == [float(i) for i in range(FRAMES)], means[:5]
    print(
        f"{FRAMES} frames of {SHAPE[1]}x{SHAPE[0]} uint16 received zero-copy; means 0..{FRAMES - 1} correct"
    )


if __name__ == "__main__":
    main()
