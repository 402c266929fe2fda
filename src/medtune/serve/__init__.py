"""Using a trained model: terminal chat, batch prediction over files, and serving."""
