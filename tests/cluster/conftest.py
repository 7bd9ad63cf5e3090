"""The cluster tests need the three-node cluster of scripts/cluster.sh, up.

They run only when AMQPKIT_CLUSTER_URLS is set (`scripts/cluster.sh urls` prints it), so the default
test run (one broker) does not collect them; .ci/run starts the cluster, runs them and takes it down.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("AMQPKIT_CLUSTER_URLS") else ["test_*.py"]
