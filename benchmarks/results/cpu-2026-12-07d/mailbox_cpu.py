"""CPU of the channel actors a trial starts: ray.util.queue's two Queues against pipelines.mailbox's one Mailbox."""
import sys, time
sys.path.insert(0, ".")  # run from the repository root
import psutil, ray
from ray.util.queue import Queue
from pipelines.mailbox import Channel, Mailbox

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

def actor_cpu(name):
    procs = [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(f"ray::{name}")]
    return [round(sum(p.cpu_times()[:4]), 2) for p in procs]

for round_ in range(3):
    q1, q2 = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    q1.put(1); q2.put(2); q1.get(); q2.get()
    m = Mailbox.remote(); a, b = Channel(m, "a"), Channel(m, "b")
    a.put(1); b.put(2); a.get(); b.get()
    time.sleep(1)
    print("queues", actor_cpu("_QueueActor"), "mailbox", actor_cpu("Mailbox"), flush=True)
    for h in (q1.actor, q2.actor, m):
        ray.kill(h)
    time.sleep(2)
ray.shutdown()
