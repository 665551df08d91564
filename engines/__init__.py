"""TensorRT engines: profiles, builds, sidecars and the ``tensorrt`` runtime backend.

Importing this package never imports TensorRT: :mod:`cvvae.engines.profile`, :mod:`cvvae.engines.sidecar`,
:mod:`cvvae.engines.engine_check` (load-time checks, TensorRT objects passed in) and :mod:`cvvae.engines.trtexec` are
pure Python, and :mod:`cvvae.engines.build` / :mod:`cvvae.engines.trt_backend` import ``tensorrt`` only inside the
calls that need it.
"""

from cvvae.engines.profile import (AxisProfile, Profile, ProfileError, ProfileSpec, ShapeOutsideProfileError,
                                   ShapeTuple, choose_profile, default_spec, resolve_profiles)
from cvvae.engines.sidecar import (EngineDirError, EngineEnvironment, EngineSidecar, StaleEngineError, engine_filename,
                                   load_engine_dir, stale_reasons)

__all__ = [
    "AxisProfile", "EngineDirError", "EngineEnvironment", "EngineSidecar", "Profile", "ProfileError", "ProfileSpec",
    "ShapeOutsideProfileError", "ShapeTuple", "StaleEngineError", "choose_profile", "default_spec",
    "engine_filename", "load_engine_dir", "resolve_profiles", "stale_reasons",
]
