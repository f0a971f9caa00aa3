"""FX passes over the graphs Dynamo hands the backend (installed as ``era_compile.passes``)."""
