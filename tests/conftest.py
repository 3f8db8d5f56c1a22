"""Test session setup: 8 simulated CPU devices, float32, and no network or user caches.

The environment must be set before jax is imported anywhere, which is why it is done here at import.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="prefopt-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
