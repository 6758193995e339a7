"""Hardware fingerprints: what one device was measured to realise, and the predictions read off it.

``predict`` loads a fingerprint and answers the planner's one cost question; ``measure`` (with
``families``, ``probes``, ``timing``) measures one on this device, ``ort`` one of onnxruntime;
``schema`` validates the file, ``interp`` interpolates between measured shapes, ``device`` names
this device and where its fingerprints live.
"""

from sparsec.fingerprint.predict import (  # noqa: F401  (the package's public names)
    MODES,
    Fingerprint,
    Prediction,
    list_fingerprints,
    load_fingerprint,
    normalize_dtype,
    resolve_fingerprint_path,
)

__all__ = ["MODES", "Fingerprint", "Prediction", "list_fingerprints", "load_fingerprint", "normalize_dtype",
           "resolve_fingerprint_path"]
