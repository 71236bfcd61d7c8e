from order_monitor.cli import main

main()
