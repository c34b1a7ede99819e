"""Loaded by every Python process a storage test starts (this folder leads PYTHONPATH): a connection or name
lookup for any host but this machine's loopback is refused and written to $MVLP_EGRESS_LOG, which the test
then requires to be empty. Clients in C++ (TensorStore, ArrayRecord) are caught by the proxy sink instead."""

import os

if os.environ.get("MVLP_EGRESS_LOG"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.gcs_server import install_socket_guard

    install_socket_guard(os.environ["MVLP_EGRESS_LOG"])
