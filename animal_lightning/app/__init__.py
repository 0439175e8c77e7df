"""app.py's page: try a trained checkpoint in the browser (service: the model; uploads: files and zips;
page: the Gradio page; server: from the config to a served page). Gradio is imported only by page and server."""
