#!/usr/bin/env python3
"""The control socket's JSON protocol against a running guest, as a script
would speak it: a subscriber sees pause/resume/shutdown as events while a
second client pauses, resumes and stops the guest; bad requests get error
replies and the guest goes on. One line per fact, for run.sh to check.

usage: control_json.py SOCKET
       control_json.py --events SOCKET: subscribes, then prints "event NAME REASON"
       for each event until lkvm closes the socket
"""
import json
import socket
import sys


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(600)
        self.sock.connect(path)
        self.buffer = b""
        self.greeting = self.line()

    def line(self):
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def send(self, raw):
        self.sock.sendall(raw if isinstance(raw, bytes) else json.dumps(raw).encode() + b"\n")

    def execute(self, command, arguments=None, **extra):
        request = {"execute": command, **extra}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(request)
        return self.reply()

    def reply(self):
        while True:
            message = self.line()
            if message is None or "event" not in message:
                return message


def print_events(path):
    watcher = Client(path)
    watcher.execute("subscribe")
    while (event := watcher.line()) is not None:
        print("event", event["event"], event["data"].get("reason", ""), flush=True)


def main():
    if sys.argv[1] == "--events":
        return print_events(sys.argv[2])
    path = sys.argv[1]
    watcher, client = Client(path), Client(path)
    lkvm = watcher.greeting.get("lkvm", {})
    print("greeting", "ok" if lkvm.get("version") and "events" in lkvm.get("capabilities", []) else watcher.greeting)
    print("subscribe", watcher.execute("subscribe", id="w1"))

    stat = client.execute("stat", id=7)
    ret = stat.get("return", {})
    print("stat", "ok" if stat.get("id") == 7 and ret.get("time_ns", 0) > 0 and len(ret.get("queues", [])) > 0
          and all("requests" in q for q in ret["queues"]) else stat)

    # Bad requests: each an error reply of its class; the connection and the guest go on.
    bad = [
        ("unknown", {"execute": "fly"}),
        ("not-json", b"this is not json\n"),
        ("truncated", b'{"execute": "st\n'),
        ("not-utf8", b'{"execute": "\xff\xfe"}\n'),
        ("deep", b"[" * 64 + b"]" * 64 + b"\n"),
        ("wrong-type", {"execute": "throttle", "arguments": {"target": 0, "limits": {"iops": "many"}}}),
        ("no-execute", {"arguments": {}}),
    ]
    for name, request in bad:
        client.send(request)
        reply = client.reply()
        print("bad", name, reply["error"]["class"] if reply and "error" in reply else reply)
    info = client.execute("info")["return"]
    print("after-bad", info["state"], info["name"])

    print("pause", client.execute("pause"))
    print("event", watcher.line().get("event"))
    print("info-paused", client.execute("info")["return"]["state"])
    print("resume", client.execute("resume"))
    print("event", watcher.line().get("event"))
    print("stop", client.execute("stop"))
    event = watcher.line()
    print("event", event.get("event"), "exit_status=%s" % event.get("data", {}).get("exit_status"),
          "timestamp-ok" if event.get("timestamp", {}).get("seconds", 0) > 0 else event)
    print("after-shutdown", watcher.line())


main()
