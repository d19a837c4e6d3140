"""edgecore: EdgeHub, MetaManager, MetaServer, Edged, DeviceTwin, EventBus and ServiceBus."""
