"""Serving a trained model: the recommender API (`serving.recommender`), retrieval indexes (`serving.index`) and the
MLflow pyfunc flavour of a registered version (`serving.pyfunc`). Plain torch / numpy / faiss: no Ray."""
