"""TensorFlow's collectives for tokens split across workers (API.md 9.1; the counts themselves are
xseqloss/distributed.py): inside ``strategy.run`` the replica context's all-reduce."""

from __future__ import annotations

from typing import Any

import tensorflow as tf


class TensorflowCollectives:
    def worker_count(self, group: Any, axis_name: Any) -> Any:
        ctx = tf.distribute.get_replica_context()
        return 1 if ctx is None else ctx.num_replicas_in_sync

    def sum_over_workers(self, fn: str, local: Any, targets: Any, group: Any, axis_name: Any, validate: bool) -> Any:
        return _tf_sum(local())


def _tf_sum(count: Any) -> Any:
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return count  # cross-replica context (the global batch) or no strategy: the count is complete
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
