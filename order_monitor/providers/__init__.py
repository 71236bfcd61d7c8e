"""Provider adapters: how order-monitor asks a provider about an order."""
