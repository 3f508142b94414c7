"""Pipeline stages. Each stage is one module with one ``Stage`` subclass; see ``pipeline.runner``."""
