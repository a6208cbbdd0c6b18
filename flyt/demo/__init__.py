"""The bundled end-to-end demo, its report and its real-image toy data."""
