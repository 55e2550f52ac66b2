"""`astfad serve`: an inspection service (REST API and web page) around saved detectors.

Only `app.py` and `command.py` touch FastAPI and uvicorn (the `serve` extra); the model store, the
inference worker, the fit jobs and the metrics are plain Python, usable and testable without them.
"""
