//! Misuse and the error/enum surface: second registration, Error variants and
//! Display, RegisterError formatting without the state, trait bounds, faulted
//! channels.

mod common;

use std::{cell::Cell, collections::HashSet, error::Error as StdError, fmt::Debug, future::Future};

use callcancel::{
    CancelReason, Channel, Error, HostState, OperationContext, RegisterError, RegisterErrorKind,
    ServiceHost,
};
use common::Probe;

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}
fn assert_std_error<T: StdError + Debug + std::fmt::Display + Send + Sync + 'static>() {}
fn assert_copy_eq<T: Copy + Eq + Debug>() {}

#[test]
fn public_types_have_the_promised_traits() {
    assert_send_sync_clone::<ServiceHost>();
    assert_send_sync_clone::<Channel>();
    assert_send::<callcancel::Call>();
    assert_sync::<OperationContext>();
    assert_std_error::<Error>();
    assert_copy_eq::<Error>();
    assert_copy_eq::<CancelReason>();
    assert_copy_eq::<HostState>();
    // RegisterError is an Error for any state, even one that is not Debug/Sync.
    struct NotDebug;
    assert_std_error::<RegisterError<NotDebug>>();
    assert_std_error::<RegisterError<String>>();
    let _ = format!("{}", CancelReason::HostAbort);
    let _: fn(&callcancel::Call) -> &OperationContext = callcancel::Call::context;
}

#[test]
fn idle_future_is_send_and_static() {
    fn check<F: Future<Output = ()> + Send + 'static>(_: F) {}
    let host = ServiceHost::new();
    check(host.idle());
}

#[test]
fn second_registration_fails_and_the_first_is_unaffected() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let first = Probe::new();
    first.register_drop(&call).unwrap();
    let err = call
        .register_for_cancel(String::from("S2"), |_, _: &String| panic!("must not run"))
        .unwrap_err();
    assert_eq!(err.kind(), RegisterErrorKind::AlreadyRegistered);
    assert_eq!(err.into_state(), "S2");
    let err = call
        .register_for_cancel_with_free(
            7u8,
            |_, _: &u8| panic!("must not run"),
            |_| panic!("must not free"),
        )
        .unwrap_err();
    assert_eq!(err.into_state(), 7);
    host.abort();
    assert_eq!(first.cancels(), 1);
    call.complete();
    assert_eq!(first.frees(), 1);
}

#[test]
fn register_error_formatting_never_prints_the_state() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    call.register_for_cancel((), |_, _| {}).unwrap();
    let err = call
        .register_for_cancel(String::from("SECRET-STATE-XYZ"), |_, _: &String| {})
        .unwrap_err();
    let dbg = format!("{err:?}");
    let alt = format!("{err:#?}");
    let disp = err.to_string();
    for s in [&dbg, &alt, &disp] {
        assert!(!s.contains("SECRET"), "state leaked into {s:?}");
    }
    assert!(!disp.is_empty());
    assert!(!dbg.is_empty());
    // Usable as a boxed std error (state is Send + Sync + 'static here).
    let boxed: Box<dyn StdError + Send + Sync> = Box::new(err);
    assert!(!boxed.to_string().contains("SECRET"));
}

#[test]
fn register_accepts_a_send_but_not_sync_state() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    call.register_for_cancel(Cell::new(1u32), |_, c: &Cell<u32>| c.set(c.get() + 1))
        .unwrap();
    host.abort();
    call.complete();
}

#[test]
fn error_variants_are_distinct_with_distinct_messages() {
    let all = [
        Error::HostAborted,
        Error::HostClosed,
        Error::ChannelFaulted,
        Error::Timeout,
    ];
    let msgs: HashSet<String> = all.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        msgs.len(),
        all.len(),
        "Display messages must differ: {msgs:?}"
    );
    assert!(msgs.iter().all(|m| !m.is_empty()));
    for (i, a) in all.iter().enumerate() {
        for (j, b) in all.iter().enumerate() {
            assert_eq!(i == j, a == b);
        }
        let e: &dyn StdError = a;
        assert!(e.source().is_none());
    }
    fn question_mark() -> Result<(), Box<dyn StdError>> {
        let host = ServiceHost::new();
        host.abort();
        host.open_channel()?;
        Ok(())
    }
    let err = question_mark().unwrap_err();
    assert_eq!(err.downcast_ref::<Error>(), Some(&Error::HostAborted));
}

#[test]
fn errors_are_matchable() {
    let host = ServiceHost::new();
    let ch = host.open_channel().unwrap();
    ch.fault();
    let kind = match ch.begin_call() {
        Err(Error::ChannelFaulted) => "faulted",
        Err(_) => "other error",
        Ok(_) => "ok",
    };
    assert_eq!(kind, "faulted");
}

#[test]
fn faulted_channel_refuses_calls_and_leaves_others_alone() {
    let host = ServiceHost::new();
    let a = host.open_channel().unwrap();
    let b = host.open_channel().unwrap();
    assert!(!a.is_faulted());
    a.fault();
    a.fault(); // idempotent
    assert!(a.is_faulted());
    assert!(a.clone().is_faulted(), "clones share the channel");
    assert_eq!(a.begin_call().err(), Some(Error::ChannelFaulted));
    assert!(!b.is_faulted());
    let call = b.begin_call().unwrap();
    assert!(!call.is_cancelled());
    assert_eq!(host.state(), HostState::Open);
    let hcall = host.begin_call().unwrap();
    assert!(!hcall.is_cancelled());
    assert!(host.open_channel().is_ok());
}

#[test]
fn host_state_traits() {
    let s = HostState::Open;
    let t = s;
    assert_eq!(s, t);
    assert_ne!(HostState::Open, HostState::Closed);
    assert_ne!(HostState::Aborted, HostState::Closing);
    assert!(format!("{:?}", HostState::Aborted).contains("Aborted"));
}

#[test]
fn call_derefs_to_its_context() {
    let host = ServiceHost::new();
    let call = host.begin_call().unwrap();
    let via_deref: &OperationContext = &call;
    let via_method = call.context();
    assert!(std::ptr::eq(via_deref, via_method));
    assert!(!via_method.is_cancelled());
    assert_eq!(via_deref.cancel_reason(), None);
}
