"""cloudcore: CloudHub, EdgeController, DeviceController and the embedded control plane."""
