"""The MQTT side: ``bridge`` publishes the site's states and alerts and takes operator
commands; ``follower`` lets a stand-alone station proxy follow its site's mode."""
