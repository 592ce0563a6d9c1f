//! What one collection of a target saw, as plain data: the workload's status, its pods, the events
//! about them, the HPA, the nodes they run on and the log lines not seen before. Built from the
//! Kubernetes objects of the reflectors' stores; the alert rules and the summarizer read only this.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::config::WatchTarget;

/// The workload's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// Replicas wanted (pods scheduled for a DaemonSet, completions for a Job).
    pub desired: i32,
    /// Replicas ready.
    pub ready: i32,
    /// The pods' label selector (`matchLabels`).
    pub selector: BTreeMap<String, String>,
    /// Failed pods of a Job.
    pub failed: i32,
    /// Active pods of a Job or jobs of a CronJob.
    pub active: i32,
    /// A CronJob's last schedule time.
    pub last_schedule: Option<SystemTime>,
    /// A suspended CronJob.
    pub suspended: bool,
}

/// One container of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Its name.
    pub name: String,
    /// Ready.
    pub ready: bool,
    /// Restarts.
    pub restarts: i32,
    /// Why it is waiting (`CrashLoopBackOff`, `ImagePullBackOff`, …).
    pub waiting: Option<String>,
    /// Why its last run ended (`OOMKilled`, `Error`, …).
    pub last_termination: Option<String>,
}

/// One pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Its name.
    pub name: String,
    /// `Running`, `Pending`, `Succeeded`, `Failed`, `Unknown`.
    pub phase: String,
    /// The `Ready` condition.
    pub ready: bool,
    /// The node it runs on.
    pub node: Option<String>,
    /// Its IP.
    pub ip: Option<String>,
    /// Its containers.
    pub containers: Vec<ContainerInfo>,
}

impl PodInfo {
    /// Restarts of all its containers.
    pub fn restarts(&self) -> i32 {
        self.containers.iter().map(|c| c.restarts).sum()
    }
}

/// One event about the workload or one of its pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// `Normal` or `Warning`.
    pub kind: String,
    /// `BackOff`, `FailedScheduling`, …
    pub reason: String,
    /// The message.
    pub message: String,
    /// `Kind/name` of the object.
    pub object: String,
    /// How often it happened.
    pub count: i32,
    /// When it last happened.
    pub last: Option<SystemTime>,
}

/// The HPA scaling the workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HpaInfo {
    /// Its name.
    pub name: String,
    /// Bounds.
    pub min: i32,
    /// Bounds.
    pub max: i32,
    /// Current replicas.
    pub current: i32,
    /// Desired replicas.
    pub desired: i32,
}

/// A node one of the pods runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Condition type → status (`True`, `False`, `Unknown`).
    pub conditions: BTreeMap<String, String>,
    /// Cordoned.
    pub unschedulable: bool,
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The pod.
    pub pod: String,
    /// The container.
    pub container: String,
    /// The API server's timestamp of the line.
    pub time: String,
    /// The text.
    pub text: String,
}

impl LogLine {
    /// Whether the line reports an error (error, fatal, panic, exception, oomkilled).
    pub fn is_error(&self) -> bool {
        let t = self.text.to_ascii_lowercase();
        ["error", "fatal", "panic", "exception", "oomkilled"]
            .iter()
            .any(|w| t.contains(w))
    }
}

/// What one collection saw.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The target.
    pub target: WatchTarget,
    /// When it was taken.
    pub taken: Option<SystemTime>,
    /// The workload, when it exists.
    pub workload: Option<WorkloadInfo>,
    /// Its pods.
    pub pods: Vec<PodInfo>,
    /// Recent events, newest last.
    pub events: Vec<EventInfo>,
    /// The HPA.
    pub hpa: Option<HpaInfo>,
    /// The nodes of its pods.
    pub nodes: Vec<NodeInfo>,
    /// The recent log lines kept (each line once), oldest first.
    pub logs: Vec<LogLine>,
    /// Samples scraped from the pods' Prometheus endpoints (`metricsPort`): (pod, sample line).
    pub metrics: Vec<(String, String)>,
}

impl Snapshot {
    /// Pods ready.
    pub fn pods_ready(&self) -> usize {
        self.pods.iter().filter(|p| p.ready).count()
    }
    /// The log lines that report errors.
    pub fn error_logs(&self) -> impl Iterator<Item = &LogLine> {
        self.logs.iter().filter(|l| l.is_error())
    }
}

fn time(t: &Option<Time>) -> Option<SystemTime> {
    let t = t.as_ref()?;
    Some(SystemTime::from(t.0))
}

/// The workload info of any supported kind.
pub trait Workload {
    /// See [`WorkloadInfo`].
    fn info(&self) -> WorkloadInfo;
}

impl Workload for Deployment {
    fn info(&self) -> WorkloadInfo {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        WorkloadInfo {
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            selector: spec
                .and_then(|s| s.selector.match_labels.clone())
                .unwrap_or_default(),
            ..WorkloadInfo::default()
        }
    }
}

impl Workload for StatefulSet {
    fn info(&self) -> WorkloadInfo {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        WorkloadInfo {
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            selector: spec
                .and_then(|s| s.selector.match_labels.clone())
                .unwrap_or_default(),
            ..WorkloadInfo::default()
        }
    }
}

impl Workload for DaemonSet {
    fn info(&self) -> WorkloadInfo {
        let status = self.status.as_ref();
        WorkloadInfo {
            desired: status.map_or(0, |s| s.desired_number_scheduled),
            ready: status.map_or(0, |s| s.number_ready),
            selector: self
                .spec
                .as_ref()
                .and_then(|s| s.selector.match_labels.clone())
                .unwrap_or_default(),
            ..WorkloadInfo::default()
        }
    }
}

impl Workload for Job {
    fn info(&self) -> WorkloadInfo {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        WorkloadInfo {
            desired: spec.and_then(|s| s.completions).unwrap_or(1),
            ready: status.and_then(|s| s.ready).unwrap_or(0),
            selector: spec
                .and_then(|s| s.selector.as_ref())
                .and_then(|s| s.match_labels.clone())
                .unwrap_or_default(),
            failed: status.and_then(|s| s.failed).unwrap_or(0),
            active: status.and_then(|s| s.active).unwrap_or(0),
            ..WorkloadInfo::default()
        }
    }
}

impl Workload for CronJob {
    fn info(&self) -> WorkloadInfo {
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        WorkloadInfo {
            selector: spec
                .and_then(|s| s.job_template.spec.as_ref())
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.labels.clone())
                .unwrap_or_default(),
            active: status
                .and_then(|s| s.active.as_ref())
                .map_or(0, |a| i32::try_from(a.len()).unwrap_or(i32::MAX)),
            last_schedule: status.and_then(|s| time(&s.last_schedule_time)),
            suspended: spec.and_then(|s| s.suspend).unwrap_or(false),
            ..WorkloadInfo::default()
        }
    }
}

/// A pod as [`PodInfo`].
pub fn pod_info(p: &Pod) -> PodInfo {
    let status = p.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let containers = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| ContainerInfo {
                    name: c.name.clone(),
                    ready: c.ready,
                    restarts: c.restart_count,
                    waiting: c
                        .state
                        .as_ref()
                        .and_then(|s| s.waiting.as_ref())
                        .and_then(|w| w.reason.clone()),
                    last_termination: c
                        .last_state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .or_else(|| c.state.as_ref().and_then(|s| s.terminated.as_ref()))
                        .and_then(|t| t.reason.clone()),
                })
                .collect()
        })
        .unwrap_or_default();
    PodInfo {
        name: p.metadata.name.clone().unwrap_or_default(),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        ready,
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        ip: status.and_then(|s| s.pod_ip.clone()),
        containers,
    }
}

/// An event as [`EventInfo`].
pub fn event_info(e: &Event) -> EventInfo {
    EventInfo {
        kind: e.type_.clone().unwrap_or_default(),
        reason: e.reason.clone().unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        object: format!(
            "{}/{}",
            e.involved_object.kind.as_deref().unwrap_or(""),
            e.involved_object.name.as_deref().unwrap_or("")
        ),
        count: e.count.unwrap_or(1),
        last: time(&e.last_timestamp)
            .or_else(|| e.event_time.as_ref().map(|t| SystemTime::from(t.0))),
    }
}

/// The HPA scaling `target`, if `h` is it.
pub fn hpa_info(h: &HorizontalPodAutoscaler, target: &WatchTarget) -> Option<HpaInfo> {
    let spec = h.spec.as_ref()?;
    if spec.scale_target_ref.name != target.deployment
        || spec.scale_target_ref.kind != target.kind.as_str()
    {
        return None;
    }
    let status = h.status.as_ref();
    Some(HpaInfo {
        name: h.metadata.name.clone().unwrap_or_default(),
        min: spec.min_replicas.unwrap_or(1),
        max: spec.max_replicas,
        current: status.and_then(|s| s.current_replicas).unwrap_or(0),
        desired: status.map_or(0, |s| s.desired_replicas),
    })
}

/// A node as [`NodeInfo`].
pub fn node_info(n: &Node) -> NodeInfo {
    NodeInfo {
        name: n.metadata.name.clone().unwrap_or_default(),
        conditions: n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(|c| {
                c.iter()
                    .map(|c| (c.type_.clone(), c.status.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
    }
}
