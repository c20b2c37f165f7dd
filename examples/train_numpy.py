"""A plain NumPy training loop with :class:`sparcomm.reducer.GradientReducer`.

Softmax regression on the digits data, data-parallel::

    sparcomm run -np 4 -- python examples/train_numpy.py

The same pattern serves JAX or any framework whose gradients can be viewed as NumPy
(or CuPy) arrays.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from sparcomm import ErrorFeedback, TopK
from sparcomm.demo import load_task
from sparcomm.reducer import GradientReducer


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x_train, y_train, x_test, y_test = load_task("digits")
    x_local, y_local = x_train[rank::size], y_train[rank::size]
    params = {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    reducer = GradientReducer(codec=ErrorFeedback(TopK(density=0.1)), dense_below=100)
    rng = np.random.default_rng(rank)
    for _ in range(300):
        batch = rng.choice(len(y_local), 32, replace=False)
        x, y = x_local[batch], y_local[batch]
        logits = x @ params["w"] + params["b"]
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        probabilities[np.arange(len(y)), y] -= 1.0  # d(cross-entropy)/d(logits)
        grads = {"w": x.T @ probabilities / len(y), "b": probabilities.mean(axis=0)}
        # the reducer fuses "b" into a dense bucket and sends 10 % of "w"
        grads = reducer.reduce(grads)
        for name in params:
            params[name] -= 0.5 * grads[name]
    accuracy = ((x_test @ params["w"] + params["b"]).argmax(axis=1) == y_test).mean()
    if rank == 0:
        print(f"test accuracy {100 * accuracy:.1f} % on {size} ranks")
    reducer.close()


if __name__ == "__main__":
    main()
