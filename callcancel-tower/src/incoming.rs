//! Connections are channels in servers whose accept loop is not ours:
//! tonic's `Server` ([`CallIncoming`] and `Connected` for [`CallIo`]) and
//! `axum::serve` ([`CallListener`]).

#[cfg(feature = "axum")]
pub use self::axum_serve::CallListener;
#[cfg(feature = "tonic-server")]
pub use self::tonic_server::CallIncoming;

#[cfg(feature = "tonic-server")]
mod tonic_server {
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use futures_core::Stream;
    use pin_project_lite::pin_project;
    use tonic::transport::server::Connected;

    use crate::cc::ServiceHost;
    use crate::conn::CallIo;
    use crate::layer::ConnectionChannel;

    /// The connect info tonic's `Server` inserts into each request: the
    /// connection's channel, for [`CallLayer`](crate::CallLayer) (which
    /// then inserts the transport's own connect info, e.g.
    /// `TcpConnectInfo`, so `Request::remote_addr` still works).
    impl<T: Connected> Connected for CallIo<T> {
        type ConnectInfo = ConnectionChannel;

        fn connect_info(&self) -> ConnectionChannel {
            ConnectionChannel::with_info(self.channel().clone(), self.get_ref().connect_info())
        }
    }

    pin_project! {
        /// A stream of accepted connections (e.g. tonic's `TcpIncoming`) whose
        /// every connection is a channel of `host`: each one is wrapped in a
        /// [`CallIo`] (the channel faults when the connection ends); while
        /// the host refuses channels (closing, aborted) new connections are
        /// closed at once.
        ///
        /// ```no_run
        /// # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
        /// use callcancel_tower::{cc::ServiceHost, CallIncoming, CallLayer};
        /// use tonic::transport::server::TcpIncoming;
        /// let host = ServiceHost::new();
        /// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
        /// let incoming = CallIncoming::new(host.clone(), TcpIncoming::from(listener));
        /// tonic::transport::Server::builder()
        ///     .layer(CallLayer::new(host))
        ///     .add_routes(routes)
        ///     .serve_with_incoming(incoming)
        ///     .await?;
        /// # Ok(()) }
        /// ```
        #[derive(Debug)]
        pub struct CallIncoming<S> {
            #[pin]
            inner: S,
            host: ServiceHost,
        }
    }

    impl<S> CallIncoming<S> {
        /// Wraps `inner`, opening a channel of `host` per connection.
        pub fn new(host: ServiceHost, inner: S) -> Self {
            Self { inner, host }
        }
    }

    impl<S, IO, E> Stream for CallIncoming<S>
    where
        S: Stream<Item = Result<IO, E>>,
    {
        type Item = Result<CallIo<IO>, E>;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let mut this = self.project();
            loop {
                let io = match ready!(this.inner.as_mut().poll_next(cx)) {
                    Some(Ok(io)) => io,
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    None => return Poll::Ready(None),
                };
                match this.host.open_channel() {
                    Ok(channel) => return Poll::Ready(Some(Ok(CallIo::new(io, channel)))),
                    Err(e) => {
                        tracing::debug!(target: "callcancel", error = %e, "connection refused");
                    }
                }
            }
        }

        fn size_hint(&self) -> (usize, Option<usize>) {
            (0, self.inner.size_hint().1)
        }
    }
}

#[cfg(feature = "axum")]
mod axum_serve {
    use std::io;

    use axum::extract::connect_info::Connected;
    use axum::serve::{IncomingStream, Listener};

    use crate::cc::ServiceHost;
    use crate::conn::CallIo;
    use crate::layer::ConnectionChannel;

    /// An `axum::serve::Listener` whose every connection is a channel of
    /// `host` ([`CallIo`]); while the host refuses channels, new
    /// connections are closed at once.
    ///
    /// Serve the router through `into_make_service_with_connect_info::<ConnectionChannel>()`
    /// so [`CallLayer`](crate::CallLayer) finds each connection's channel;
    /// it also inserts `ConnectInfo<Addr>` (the peer address), so axum's
    /// `ConnectInfo<SocketAddr>` extractor still works.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// use axum::{routing::get, Router};
    /// use callcancel_tower::{cc::ServiceHost, CallLayer, CallListener, ConnectionChannel};
    /// let host = ServiceHost::new();
    /// let app = Router::new()
    ///     .route("/", get(|| async { "hi" }))
    ///     .layer(CallLayer::new(host.clone()));
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(
    ///     CallListener::new(host, listener),
    ///     app.into_make_service_with_connect_info::<ConnectionChannel>(),
    /// )
    /// .await
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct CallListener<L> {
        inner: L,
        host: ServiceHost,
    }

    impl<L> CallListener<L> {
        /// Wraps `inner`, opening a channel of `host` per connection.
        pub fn new(host: ServiceHost, inner: L) -> Self {
            Self { inner, host }
        }
    }

    impl<L: Listener> Listener for CallListener<L> {
        type Io = CallIo<L::Io>;
        type Addr = L::Addr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let (io, addr) = self.inner.accept().await;
                match self.host.open_channel() {
                    Ok(channel) => return (CallIo::new(io, channel), addr),
                    Err(e) => {
                        tracing::debug!(target: "callcancel", error = %e, "connection refused");
                    }
                }
            }
        }

        fn local_addr(&self) -> io::Result<Self::Addr> {
            self.inner.local_addr()
        }
    }

    impl<L> Connected<IncomingStream<'_, CallListener<L>>> for ConnectionChannel
    where
        L: Listener,
        L::Addr: Clone + Sync + 'static,
    {
        fn connect_info(stream: IncomingStream<'_, CallListener<L>>) -> Self {
            ConnectionChannel::with_info(
                stream.io().channel().clone(),
                axum::extract::ConnectInfo(stream.remote_addr().clone()),
            )
        }
    }
}
