//! Discovery of ImageStreams through the Kubernetes API.
